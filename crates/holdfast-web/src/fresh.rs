//! Read-your-writes across replicas: after a request that wrote, the browser gets a signed
//! token naming the primary's WAL position at the answer; a later read that may go to a
//! standby ([`ReadAfter`]) goes to one only once it has replayed that position.
//!
//! The token is a cookie, `<lsn>.<expires>.<signature>`: the position in hex, when it stops
//! counting (Unix seconds), and the first 16 bytes of an HMAC-SHA256 over both under a key
//! every instance reads from the store ([`holdfast_store::Store::shared_secret`]), so any
//! instance honours any instance's token with no key to configure. A token that does not
//! verify — forged, expired, garbled — sends the read to the primary: never an error, never a
//! stale read. It lives [`READ_TOKEN_TTL`], well past the lag bound that takes a standby out
//! of rotation, so once it is gone every standby in rotation has its writes.

use crate::{AppResult, AppState};
use axum::extract::{FromRef, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use hmac::{Mac, SimpleHmac};
use holdfast_store::{Freshness, Lsn};
use sha2::Sha256;
use std::time::Duration;

/// How long a read-your-writes token counts after the write it follows.
pub const READ_TOKEN_TTL: Duration = Duration::from_secs(60);

/// The name of the store's secret that signs tokens.
const SECRET: &str = "read-your-writes";

/// The token handed out when none can be signed: it never verifies.
const UNSIGNED: &str = "primary";

/// Bytes of the signature kept in the token.
const SIGNATURE_BYTES: usize = 16;

type HmacSha256 = SimpleHmac<Sha256>;

/// The read-your-writes cookie's name. With `Secure` the `__Host-` prefix also pins it to
/// this host and path `/`.
pub fn read_cookie_name(secure: bool) -> &'static str {
    if secure {
        "__Host-holdfast_read_after"
    } else {
        "holdfast_read_after"
    }
}

/// How fresh this request's reads must be: a handler passes it to
/// [`holdfast_store::Store::read_replica`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAfter(pub Freshness);

impl<S> FromRequestParts<S> for ReadAfter
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = crate::AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> AppResult<Self> {
        let st = AppState::from_ref(state);
        Ok(ReadAfter(freshness(&st, &parts.headers).await))
    }
}

/// What the request's token (if any) says about how fresh its reads must be.
async fn freshness(st: &AppState, headers: &HeaderMap) -> Freshness {
    if !st.store.reads_from_replicas() {
        return Freshness::Any;
    }
    let secure = st.opts.secure_cookies;
    let Some(token) = crate::session::cookie_value(headers, read_cookie_name(secure)) else {
        return Freshness::Any;
    };
    let verified = match key(st).await {
        Some(key) => verify(&key, token, holdfast_core::now_ms() / 1000),
        None => None,
    };
    match verified {
        Some(lsn) => Freshness::AtLeast(lsn),
        None => {
            metrics::counter!("holdfast_read_tokens_refused_total").increment(1);
            Freshness::Latest
        }
    }
}

/// The key tokens are signed with, read from the store once per process.
async fn key(st: &AppState) -> Option<Vec<u8>> {
    st.read_key
        .get_or_try_init(|| st.store.shared_secret(SECRET))
        .await
        .inspect_err(
            |e| tracing::warn!(error = %e, "no read-your-writes key: reads go to the primary"),
        )
        .ok()
        .cloned()
}

/// The token for `lsn`, counting until `expires` (Unix seconds).
pub fn sign(key: &[u8], lsn: Lsn, expires: i64) -> Option<String> {
    let body = format!("{:x}.{expires}", lsn.0);
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(body.as_bytes());
    let tag = mac.finalize().into_bytes();
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag[..SIGNATURE_BYTES]);
    Some(format!("{body}.{sig}"))
}

/// The position a token names, if its signature holds and it has not expired at `now`.
pub fn verify(key: &[u8], token: &str, now: i64) -> Option<Lsn> {
    let (body, sig) = token.rsplit_once('.')?;
    let (lsn, expires) = body.split_once('.')?;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .ok()?;
    (sig.len() == SIGNATURE_BYTES).then_some(())?;
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(body.as_bytes());
    mac.verify_truncated_left(&sig).ok()?;
    let expires: i64 = expires.parse().ok()?;
    (now < expires).then_some(())?;
    u64::from_str_radix(lsn, 16).ok().map(Lsn)
}

/// After a request that wrote and succeeded, while reads may go to standbys: hands the
/// browser a token for the primary's position now, which is at or after every commit the
/// request made.
pub(crate) async fn hand_out_token(
    State(st): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let wrote = !req.method().is_safe();
    let mut resp = next.run(req).await;
    if !wrote || !resp.status().is_success() || !st.store.reads_from_replicas() {
        return resp;
    }
    let Some(lsn) = st.store.write_position().await else {
        return resp;
    };
    let ttl = READ_TOKEN_TTL.as_secs() as i64;
    // Without the key (the store could not be read), a token that cannot verify: its reads
    // go to the primary, which has the write.
    let token = match key(&st).await {
        Some(key) => sign(&key, lsn, holdfast_core::now_ms() / 1000 + ttl),
        None => None,
    }
    .unwrap_or_else(|| UNSIGNED.to_owned());
    let secure = st.opts.secure_cookies;
    let cookie = format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={ttl}{}",
        read_cookie_name(secure),
        if secure { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_until_it_expires_and_never_when_altered() {
        let key = b"k".repeat(32);
        let lsn = Lsn(0x0016_B374_D848);
        let token = sign(&key, lsn, 1000).unwrap();
        assert_eq!(verify(&key, &token, 999), Some(lsn));
        assert_eq!(verify(&key, &token, 1000), None, "expired");
        assert_eq!(verify(b"other key", &token, 999), None, "another key");
        let (body, sig) = token.rsplit_once('.').unwrap();
        let raised = body.replacen(&format!("{:x}", lsn.0), "ffffffffff", 1);
        assert_eq!(
            verify(&key, &format!("{raised}.{sig}"), 999),
            None,
            "forged"
        );
        let extended = body.replacen("1000", "9999", 1);
        assert_eq!(
            verify(&key, &format!("{extended}.{sig}"), 999),
            None,
            "forged"
        );
        for garbled in ["", ".", "..", "x.y.z", "1.2", &token[..token.len() - 2]] {
            assert_eq!(verify(&key, garbled, 999), None, "{garbled:?}");
        }
    }
}
