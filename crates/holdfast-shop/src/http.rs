//! The shop's routes: the page, the catalog, the cart, checkout and orders. `holdfast_web::app`
//! wraps them in the accounts API, sessions, CSRF and the operator endpoints.
//!
//! Every handler that touches a user's records takes [`Authed`] (or, for checkout and the cart
//! add, the user its claim names) and passes its user id to the SQL, which filters by it. The
//! unsafe ones take an [`Idempotent`] body: the key is claimed by the handler's own
//! transaction, and the answer is stored in the same commit as the effect.

use crate::domain::{OrderId, Quantity, Sku};
use crate::sql::{self, Cart, CartShape, Order};
use crate::Error;
use axum::extract::{FromRef, FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use holdfast_cache::Ttl;
use holdfast_core::Sabotage;
use holdfast_store::{
    Backend, Freshness, Rerun, ScopedFutureExt, Statement, Store, StoredResponse, TxError,
};
use holdfast_web::{
    json_response, parse_json, AppError, AppResult, AppState, Authed, FromBody, Idempotent,
    JsonBody, OneStatement, PathParam, ReadAfter, Required,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The shop's knobs. Defaults are production values.
#[derive(Debug, Clone)]
pub struct ShopOptions {
    /// Where the catalog cache (`GET /api/products`) keeps its entries: in this process, or
    /// shared by the fleet in Redis. Either way the store is the origin; the cache is a copy.
    pub catalog_cache: CatalogCache,
    /// How long a cached catalog is served without asking the store.
    pub catalog_ttl: Duration,
    /// How long past its TTL a cached catalog still stands in while the store fails.
    pub catalog_stale_if_error: Duration,
    /// Mount `POST /bench/checkout`: the checkout without an `Idempotency-Key`, the baseline
    /// `holdfast bench checkout` measures the key's cost against.
    pub bench_routes: bool,
    /// A deliberately broken build (see [`crate::sabotage`]). Never set in production.
    pub sabotage: Option<Sabotage>,
    /// The shop schema this build runs: [`crate::SCHEMA`], or for the old binary of a
    /// rolling-deploy drill [`crate::SCHEMA_BEFORE_CART_LINES`] (it reads and writes only
    /// `cart_items`). The store must be opened with the same one.
    pub schema: &'static holdfast_store::Schema,
    /// Where video reviews' bytes go, and the upload knobs; `None` mounts no upload routes.
    pub uploads: Option<UploadSetup>,
}

/// The shop's uploads: a blob store and the options of `holdfast-uploads`.
#[derive(Clone)]
pub struct UploadSetup {
    pub blobs: Arc<dyn holdfast_uploads::BlobStore>,
    pub options: holdfast_uploads::UploadOptions,
}

impl UploadSetup {
    /// Blobs in `dir` (`<data dir>/uploads` for `holdfast serve`), default options.
    pub fn local(dir: impl Into<std::path::PathBuf>) -> Result<Self, holdfast_uploads::Error> {
        Ok(Self {
            blobs: Arc::new(holdfast_uploads::LocalDir::new(dir)?),
            options: holdfast_uploads::UploadOptions::default(),
        })
    }
}

impl std::fmt::Debug for UploadSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadSetup")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Default for ShopOptions {
    fn default() -> Self {
        Self {
            catalog_cache: CatalogCache::Local,
            catalog_ttl: Duration::from_secs(30),
            catalog_stale_if_error: Duration::from_secs(5 * 60),
            bench_routes: false,
            sabotage: None,
            schema: &crate::SCHEMA,
            uploads: None,
        }
    }
}

/// The catalog cache's tier (see [`ShopOptions::catalog_cache`]).
#[derive(Clone, Default)]
pub enum CatalogCache {
    /// One copy per instance.
    #[default]
    Local,
    /// One copy per fleet, under `prefix` (e.g. `holdfast:catalog:v1`), with fleet-wide
    /// single flight. A Redis outage falls back to the store.
    Redis {
        conn: holdfast_cache::redis::aio::ConnectionManager,
        prefix: String,
    },
}

impl std::fmt::Debug for CatalogCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CatalogCache::Local => f.write_str("Local"),
            CatalogCache::Redis { prefix, .. } => f
                .debug_struct("Redis")
                .field("prefix", prefix)
                .finish_non_exhaustive(),
        }
    }
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

/// The shop's state: the edge's, plus its catalog cache and options. Cheap to clone.
#[derive(Clone)]
pub struct Shop {
    edge: AppState,
    catalog: Catalog,
    opts: Arc<ShopOptions>,
    /// The cart shape last learnt from the store, when, and whether it is final (the
    /// contract ran, and cannot be undone).
    cart_shape: Arc<Mutex<Option<(Instant, CartShape, bool)>>>,
    /// Video reviews, when [`ShopOptions::uploads`] is set.
    uploads: Option<holdfast_uploads::Uploads>,
}

impl FromRef<Shop> for AppState {
    fn from_ref(shop: &Shop) -> AppState {
        shop.edge.clone()
    }
}

impl Shop {
    pub fn new(edge: AppState, opts: ShopOptions) -> Self {
        let builder = Catalog::builder(Ttl::new(opts.catalog_ttl))
            .name("catalog")
            .beta(1.0)
            .stale_if_error(opts.catalog_stale_if_error);
        let catalog = match &opts.catalog_cache {
            CatalogCache::Local => builder.build(),
            CatalogCache::Redis { conn, prefix } => {
                builder.redis(conn.clone(), prefix.clone()).build()
            }
        };
        let uploads = opts.uploads.as_ref().map(|u| {
            holdfast_uploads::Uploads::new(
                edge.store().clone(),
                u.blobs.clone(),
                Arc::new(crate::reviews::Reviews),
                u.options.clone(),
            )
        });
        Self {
            edge,
            catalog,
            opts: Arc::new(opts),
            cart_shape: Arc::default(),
            uploads,
        }
    }

    /// Where carts are read and written now: asked of the store at most once per
    /// [`holdfast_store::PHASE_REFRESH`], so a switch reaches every instance within it.
    pub async fn cart_shape(&self) -> Result<CartShape, holdfast_store::Error> {
        let known = self.opts.schema.migrations.last().map_or(0, |m| m.version);
        if known < sql::CART_LINES_SWITCH_READS {
            return Ok(CartShape::OLD);
        }
        let cached = *self
            .cart_shape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, shape, last)) = cached {
            // After the contract nothing can change the shape again: no need to ask.
            if last || at.elapsed() < holdfast_store::PHASE_REFRESH {
                return Ok(shape);
            }
        }
        let applied = self.store().applied_versions(self.opts.schema.name).await?;
        let shape = CartShape::from_applied(&applied, known);
        let last = known >= sql::CART_LINES_CONTRACT && applied.contains(&sql::CART_LINES_CONTRACT);
        *self
            .cart_shape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((Instant::now(), shape, last));
        Ok(shape)
    }

    pub fn edge(&self) -> &AppState {
        &self.edge
    }

    pub fn store(&self) -> &Store {
        self.edge.store()
    }

    pub fn options(&self) -> &ShopOptions {
        &self.opts
    }

    /// Video reviews' uploads, if mounted.
    pub fn uploads(&self) -> Option<&holdfast_uploads::Uploads> {
        self.uploads.as_ref()
    }

    /// The catalog cache: flushing it loses nothing (the next read asks the store).
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }
}

/// The whole shop as one instance's router.
pub fn app(shop: Shop) -> Router {
    let mut routes = Router::new()
        .route("/", get(|| async { Html(include_str!("page.html")) }))
        .route("/api/products", get(products))
        .route("/api/cart", get(cart_get))
        .route("/api/cart/items", post(cart_add))
        .route("/api/cart/items/{sku}", delete(cart_remove))
        .route("/api/checkout", post(checkout))
        .route("/api/orders", get(orders))
        .route("/api/orders/{id}", get(order));
    if shop.opts.bench_routes {
        routes = routes.route("/bench/checkout", post(unkeyed_checkout));
    }
    let routes = crate::sabotage::apply(routes, &shop);
    let streams = match &shop.uploads {
        Some(uploads) => holdfast_uploads::router(shop.edge.clone(), uploads.clone()),
        None => Router::new(),
    };
    holdfast_web::app_with_streams(shop, routes, streams)
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        let slug = match e {
            Error::UnknownSku(_) => "unknown-sku",
            Error::QuantityLimit => "quantity-limit",
            Error::EmptyCart => "empty-cart",
        };
        AppError::unprocessable(slug, e.to_string())
    }
}

/// The catalog, read through the cache: one store query per TTL per instance (per fleet with
/// Redis), and while the store is down the last catalog is served for up to
/// `catalog_stale_if_error` past its TTL.
async fn products(State(shop): State<Shop>) -> AppResult<Response> {
    let store = shop.store().clone();
    let body = shop
        .catalog
        .get_with(CATALOG_KEY, move || async move {
            let products = store
                // No user writes the catalog: any standby in rotation may serve it.
                .read_replica("product_list", Freshness::Any, |c| {
                    sql::product_list(c).scope_boxed()
                })
                .await
                .map_err(TxError::<Infallible>::into_db)?;
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

/// Where carts live now, for a handler (see [`Shop::cart_shape`]).
impl FromRequestParts<Shop> for CartShape {
    type Rejection = AppError;
    async fn from_request_parts(_: &mut Parts, shop: &Shop) -> AppResult<Self> {
        Ok(shop.cart_shape().await?)
    }
}

async fn cart_get(
    State(shop): State<Shop>,
    shape: CartShape,
    user: Authed,
) -> AppResult<Json<Cart>> {
    let cart = shop
        .store()
        .read("cart_get", |c| {
            sql::cart_read::<Infallible>(c, &user.user_id, shape.read, "").scope_boxed()
        })
        .await?;
    Ok(Json(cart))
}

/// `{"sku": …, "qty": …}`, validated before the key is claimed.
pub(crate) struct CartAdd {
    sku: Sku,
    qty: Quantity,
}

impl FromBody for CartAdd {
    fn from_body(headers: &HeaderMap, body: &[u8]) -> AppResult<(Self, Vec<u8>)> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            sku: String,
            qty: i64,
        }
        let (JsonBody(raw), canonical) = JsonBody::<Raw>::from_body(headers, body)?;
        let add = CartAdd {
            sku: Sku::parse(&raw.sku)?,
            qty: Quantity::parse(raw.qty)?,
        };
        Ok((add, canonical))
    }
}

/// A `{sku}` path segment: 404 if it does not decode, 422 if it is no SKU.
pub(crate) struct SkuParam(Sku);

impl<S: Send + Sync> FromRequestParts<S> for SkuParam {
    type Rejection = AppError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> AppResult<Self> {
        let PathParam(raw) = PathParam::from_request_parts(parts, state).await?;
        Ok(SkuParam(Sku::parse(&raw)?))
    }
}

fn render_cart(cart: &Cart) -> StoredResponse {
    json_response(StatusCode::OK, cart)
}

fn render_order(order: &Order) -> StoredResponse {
    json_response(StatusCode::CREATED, order)
}

/// Adds to the cart. `Idempotency-Key` is optional here; with one, a retry adds only once.
///
/// Like checkout, it takes no [`Authed`]: without a key, on Postgres, the add is one
/// statement that checks the session itself (see [`sql::cart_add_statement`]).
async fn cart_add(
    State(shop): State<Shop>,
    shape: CartShape,
    Idempotent {
        body: CartAdd { sku, qty },
        mut claim,
        ..
    }: Idempotent<CartAdd>,
) -> AppResult<Response> {
    let store = shop.store();
    if claim.key().is_none() && store.backend() == Backend::Postgres && shape.read == shape.write {
        // Without a key it is a plain write: one statement in autocommit, one round trip.
        let mut stmt = Statement::new();
        let user = claim.user_in(&mut stmt);
        let select = sql::cart_add_statement(&mut stmt, shape.write, &user, &sku, qty);
        let rows = store
            .statement_rows("cart_add", Rerun::IfUncommitted, &stmt, &select)
            .await?;
        if let Some(cart) = sql::cart_from_added(&rows, &sku)? {
            return Ok(holdfast_web::respond(render_cart(&cart), false));
        }
        // No live session: the read below answers 401 (and deletes a dead one).
    }
    let user = claim.user().await?;
    claim
        .run(
            "cart_add",
            |tx| sql::cart_add(tx, shape, &user.user_id, &sku, qty).scope_boxed(),
            render_cart,
        )
        .await
}

async fn cart_remove(
    shape: CartShape,
    user: Authed,
    SkuParam(sku): SkuParam,
    Idempotent { claim, .. }: Idempotent<()>,
) -> AppResult<Response> {
    claim
        .run(
            "cart_remove",
            |tx| sql::cart_remove(tx, shape, &user.user_id, &sku).scope_boxed(),
            render_cart,
        )
        .await
}

/// Checkout takes no fields today; an empty body or `{}` are the same request.
pub(crate) struct CheckoutBody;

impl FromBody for CheckoutBody {
    fn from_body(headers: &HeaderMap, body: &[u8]) -> AppResult<(Self, Vec<u8>)> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {}
        let (Raw {}, canonical) = parse_json(headers, body, true)?;
        Ok((CheckoutBody, canonical))
    }
}

/// Turns the cart into an order. `Idempotency-Key` is required: a checkout is the request a
/// client must be able to retry blindly.
///
/// It takes no [`Authed`]: on Postgres with sessions in the store, the statement checks the
/// session itself (one round trip for the request); otherwise, and on every path but the
/// happy one, the claim reads the session first.
async fn checkout(
    shape: CartShape,
    Idempotent { claim, .. }: Idempotent<CheckoutBody, Required>,
) -> AppResult<Response> {
    let mut claim = match claim
        .in_one_statement("checkout", |stmt, key| {
            sql::checkout_statement(stmt, key, shape)
        })
        .await?
    {
        OneStatement::Answered(done) => return Ok(done),
        OneStatement::NotAnswered(claim) => *claim,
    };
    let user = claim.user().await?;
    claim
        .run(
            "checkout",
            |tx| sql::checkout(tx, shape, &user.user_id).scope_boxed(),
            render_order,
        )
        .await
}

/// The same checkout without the key (see [`ShopOptions::bench_routes`]).
async fn unkeyed_checkout(
    State(shop): State<Shop>,
    shape: CartShape,
    user: Authed,
    headers: HeaderMap,
    holdfast_web::RawBody(body): holdfast_web::RawBody,
) -> AppResult<Response> {
    let (CheckoutBody, _) = CheckoutBody::from_body(&headers, &body)?;
    let order = shop
        .store()
        .transaction("checkout", holdfast_store::Rerun::IfUncommitted, |tx| {
            sql::checkout(tx, shape, &user.user_id).scope_boxed()
        })
        .await?;
    Ok(holdfast_web::respond(render_order(&order), false))
}

/// `GET /api/orders?limit=N&after=CURSOR`: one page of the user's orders, newest first, and
/// the link to the next page (`null` on the last).
async fn orders(
    State(shop): State<Shop>,
    user: Authed,
    ReadAfter(fresh): ReadAfter,
    RawQuery(query): RawQuery,
) -> AppResult<Response> {
    let page = OrdersPage::parse(query.as_deref().unwrap_or(""))?;
    let mut orders = shop
        .store()
        .read_replica("order_list", fresh, |c| {
            sql::order_list::<Infallible>(c, &user.user_id, &page.after, page.limit + 1)
                .scope_boxed()
        })
        .await?;
    let more = orders.len() > usize::try_from(page.limit).unwrap_or(usize::MAX);
    orders.truncate(usize::try_from(page.limit).unwrap_or(usize::MAX));
    let next = match orders.last() {
        Some(last) if more => Some(format!(
            "/api/orders?limit={}&after={}.{}",
            page.limit, last.created_at, last.order_id
        )),
        _ => None,
    };
    Ok(Json(json!({ "orders": orders, "next": next })).into_response())
}

/// The order list's query: `limit` (1 to 100, default 100) and `after` (a cursor from `next`).
struct OrdersPage {
    limit: i64,
    after: sql::OrdersAfter,
}

impl OrdersPage {
    const MAX: i64 = 100;

    fn parse(query: &str) -> AppResult<Self> {
        let bad = |detail: &str| AppError::bad_request("invalid-query", detail.to_owned());
        let mut page = Self {
            limit: Self::MAX,
            after: sql::OrdersAfter::newest(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("limit", v)) => {
                    page.limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=Self::MAX).contains(n))
                        .ok_or_else(|| bad("limit must be a whole number from 1 to 100"))?;
                }
                Some(("after", v)) => {
                    let cursor = v.split_once('.').and_then(|(at, id)| {
                        let id = OrderId::parse(id).ok()?;
                        Some(sql::OrdersAfter {
                            created_at: at.parse().ok()?,
                            id: id.as_str().to_owned(),
                        })
                    });
                    page.after = cursor.ok_or_else(|| bad("after must be a cursor from next"))?;
                }
                _ => return Err(bad("unknown query parameter; use limit and after")),
            }
        }
        Ok(page)
    }
}

async fn order(
    State(shop): State<Shop>,
    user: Authed,
    ReadAfter(fresh): ReadAfter,
    PathParam(id): PathParam,
) -> AppResult<Json<Order>> {
    let missing = || AppError::not_found("no such order");
    let id = OrderId::parse(&id).map_err(|_| missing())?;
    shop.store()
        .read_replica("order_get", fresh, |c| {
            sql::order_get::<Infallible>(c, &user.user_id, &id).scope_boxed()
        })
        .await?
        .map(Json)
        .ok_or_else(missing)
}
