//! The reference shop's handlers: accounts, catalog, cart, checkout, orders.
//! Every handler that touches a user's records takes [`Authed`] and passes its user id to
//! the store, which filters by it: there is no way to name another user's cart or order.

use crate::body::{idempotency_key, parse_json, PathParam, RawBody};
use crate::error::{AppError, AppResult};
use crate::idempotency::{self, json_response, Begin};
use crate::session::{self, Authed};
use crate::{AppState, Sabotage, WebOptions};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use holdfast_cache::Ttl;
use holdfast_core::{Email, OrderId, Password, Quantity, Sku};
use holdfast_store::{Cart, Order, StoredResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    email: String,
    password: String,
}

pub async fn signup(
    State(st): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> AppResult<Response> {
    let (c, _) = parse_json::<Credentials>(&headers, &body, false)?;
    let email = Email::parse(&c.email)?;
    let hash = session::hash_password(Password::parse(&c.password)?).await?;
    let user = st.store.user_create(&email, &hash).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": user.id, "email": user.email })),
    )
        .into_response())
}

pub async fn login(
    State(st): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> AppResult<Response> {
    let (c, _) = parse_json::<Credentials>(&headers, &body, false)?;
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
    if !session::verify_password(password, stored_hash).await? {
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
pub async fn logout(State(st): State<AppState>, headers: HeaderMap) -> AppResult<Response> {
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
pub struct PasswordChange {
    current_password: String,
    new_password: String,
}

/// Changes the password and ends every session of the user, on every instance; the caller
/// gets a fresh session (a new id) in place of the one it used.
pub async fn password(
    State(st): State<AppState>,
    user: Authed,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> AppResult<Response> {
    let (c, _) = parse_json::<PasswordChange>(&headers, &body, false)?;
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
    if !session::verify_password(current, creds.map(|c| c.password_hash)).await? {
        return Err(wrong());
    }
    let hash = session::hash_password(new).await?;
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

pub async fn me(State(st): State<AppState>, user: Authed) -> AppResult<Response> {
    let u = st
        .store
        .user_get(&user.user_id)
        .await?
        .ok_or_else(AppError::unauthorized)?;
    Ok(Json(json!({ "id": u.id, "email": u.email })).into_response())
}

/// The catalog's one cache key.
const CATALOG_KEY: &str = "products";

/// The catalog cache: the rendered `GET /api/products` body, read through from the store.
pub type Catalog = holdfast_cache::Cache<&'static str, CatalogBody>;

/// A rendered JSON body: cheap to clone on a hit, stored in Redis as a JSON string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogBody(Bytes);

impl Serialize for CatalogBody {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = std::str::from_utf8(&self.0).map_err(serde::ser::Error::custom)?;
        s.serialize_str(text)
    }
}

impl<'de> Deserialize<'de> for CatalogBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| CatalogBody(Bytes::from(s)))
    }
}

pub(crate) fn catalog_cache(opts: &WebOptions) -> Catalog {
    let builder = Catalog::builder(Ttl::new(opts.catalog_ttl))
        .name("catalog")
        .beta(1.0)
        .stale_if_error(opts.catalog_stale_if_error);
    match &opts.catalog_cache {
        crate::CatalogCache::Local => builder.build(),
        crate::CatalogCache::Redis { conn, prefix } => {
            builder.redis(conn.clone(), prefix.clone()).build()
        }
    }
}

/// The catalog, read through the cache: one store query per TTL per instance (per fleet with
/// Redis), and while the store is down the last catalog is served for up to
/// `catalog_stale_if_error` past its TTL.
pub async fn products(State(st): State<AppState>) -> AppResult<Response> {
    let store = st.store.clone();
    let body = st
        .catalog
        .get_with(CATALOG_KEY, move || async move {
            let products = store.product_list().await?;
            let body = json!({ "products": products }).to_string();
            Ok::<_, holdfast_store::Error>(Some(CatalogBody(Bytes::from(body))))
        })
        .await
        .map_err(|e| {
            match e
                .origin_error()
                .and_then(|o| o.downcast_ref::<holdfast_store::Error>())
            {
                Some(se) if se.is_unavailable() => AppError::unavailable(se),
                Some(se) => AppError::internal(se),
                None => AppError::internal(e),
            }
        })?
        .ok_or_else(|| AppError::internal("the catalog origin answered nothing"))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.0,
    )
        .into_response())
}

pub async fn cart_get(State(st): State<AppState>, user: Authed) -> AppResult<Json<Cart>> {
    Ok(Json(st.store.cart_get(&user.user_id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CartAdd {
    sku: String,
    qty: i64,
}

fn render_cart(cart: &Cart) -> StoredResponse {
    json_response(StatusCode::OK, cart)
}

fn render_order(order: &Order) -> StoredResponse {
    json_response(StatusCode::CREATED, order)
}

/// Adds to the cart. `Idempotency-Key` is optional here; with one, a retry adds only once.
pub async fn cart_add(
    State(st): State<AppState>,
    user: Authed,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> AppResult<Response> {
    let key = honoured_key(&st, idempotency_key(&headers)?);
    let (add, canonical) = parse_json::<CartAdd>(&headers, &body, false)?;
    let (sku, qty) = (Sku::parse(&add.sku)?, Quantity::parse(add.qty)?);
    let claim = match idempotency::begin(
        &st,
        &user.user_id,
        key,
        method.as_str(),
        uri.path(),
        &canonical,
    )
    .await?
    {
        Begin::Replay(resp) => return Ok(resp),
        Begin::Run(claim) => claim,
    };
    let commit = claim.as_ref().map(|c| c.commit(&render_cart));
    let outcome = st
        .store
        .cart_add(&user.user_id, &sku, qty, commit.as_ref())
        .await;
    idempotency::finish(&st, claim, outcome, &render_cart).await
}

pub async fn cart_remove(
    State(st): State<AppState>,
    user: Authed,
    PathParam(sku): PathParam,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> AppResult<Response> {
    let key = honoured_key(&st, idempotency_key(&headers)?);
    let sku = Sku::parse(&sku)?;
    let claim = match idempotency::begin(&st, &user.user_id, key, method.as_str(), uri.path(), b"")
        .await?
    {
        Begin::Replay(resp) => return Ok(resp),
        Begin::Run(claim) => claim,
    };
    let commit = claim.as_ref().map(|c| c.commit(&render_cart));
    let outcome = st
        .store
        .cart_remove(&user.user_id, &sku, commit.as_ref())
        .await;
    idempotency::finish(&st, claim, outcome, &render_cart).await
}

/// Checkout takes no fields today; an empty body or `{}` are the same request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {}

/// Turns the cart into an order. `Idempotency-Key` is required: a checkout is the request a
/// client must be able to retry blindly.
pub async fn checkout(
    State(st): State<AppState>,
    user: Authed,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> AppResult<Response> {
    let key = idempotency_key(&headers)?.ok_or_else(|| {
        AppError::bad_request(
            "idempotency-key-missing",
            "checkout requires an Idempotency-Key header",
        )
    })?;
    let (CheckoutBody {}, canonical) = parse_json(&headers, &body, true)?;
    if st.opts.sabotage == Some(Sabotage::AckBeforeCommit) {
        return ack_before_commit(st, user).await;
    }
    let claim = match idempotency::begin(
        &st,
        &user.user_id,
        honoured_key(&st, Some(key)),
        method.as_str(),
        uri.path(),
        &canonical,
    )
    .await?
    {
        Begin::Replay(resp) => return Ok(resp),
        Begin::Run(claim) => claim,
    };
    let commit = claim.as_ref().map(|c| c.commit(&render_order));
    let outcome = st.store.checkout(&user.user_id, commit.as_ref()).await;
    idempotency::finish(&st, claim, outcome, &render_order).await
}

/// The key, unless the `NoIdempotency` sabotage is on.
fn honoured_key(
    st: &AppState,
    key: Option<holdfast_core::IdempotencyKey>,
) -> Option<holdfast_core::IdempotencyKey> {
    key.filter(|_| st.opts.sabotage != Some(Sabotage::NoIdempotency))
}

/// SABOTAGE: answers with an order made up from the cart, then commits the real checkout
/// half a second later in the background. The answer promises what the store may never hold.
async fn ack_before_commit(st: AppState, user: Authed) -> AppResult<Response> {
    let cart = st.store.cart_get(&user.user_id).await?;
    if cart.items.is_empty() {
        return Err(holdfast_store::Error::EmptyCart.into());
    }
    let promised = serde_json::json!({
        "order_id": OrderId::generate().to_string(),
        "total_cents": cart.total_cents,
        "status": "pending",
        "created_at": holdfast_core::now_ms(),
        "items": cart.items,
    });
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let _ = st.store.checkout(&user.user_id, None).await;
    });
    Ok((StatusCode::CREATED, Json(promised)).into_response())
}

/// The same checkout without the idempotency layer: the baseline `holdfast bench` compares
/// against. Mounted only with `WebOptions::bench_routes`.
pub async fn bench_checkout(
    State(st): State<AppState>,
    user: Authed,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> AppResult<Response> {
    let (CheckoutBody {}, _) = parse_json(&headers, &body, true)?;
    let outcome = st.store.checkout(&user.user_id, None).await;
    idempotency::finish(&st, None, outcome, &render_order).await
}

pub async fn orders(State(st): State<AppState>, user: Authed) -> AppResult<Response> {
    Ok(Json(json!({ "orders": st.store.order_list(&user.user_id, 100).await? })).into_response())
}

pub async fn order(
    State(st): State<AppState>,
    user: Authed,
    PathParam(id): PathParam,
) -> AppResult<Json<Order>> {
    let missing = || AppError::not_found("no such order");
    let id = OrderId::parse(&id).map_err(|_| missing())?;
    st.store
        .order_get(&user.user_id, &id)
        .await?
        .map(Json)
        .ok_or_else(missing)
}
