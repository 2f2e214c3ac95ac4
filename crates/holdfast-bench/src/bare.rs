//! The "bare" checkout `holdfast bench checkout --peers` measures Holdfast against: the shop's
//! own SQL (`holdfast_shop::sql::cart_add` and `checkout`, in one store transaction each) in a
//! minimal axum handler, in this process, on a database of its own on the same server — with
//! none of the layers a real request meets: no balancer, no session (the user is in the path),
//! no CSRF, no `Idempotency-Key`, no rate limits. What a checkout costs with nothing but the
//! database and HTTP.

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use holdfast_shop::sql::{self, CartShape};
use holdfast_shop::{Quantity, Sku};
use holdfast_store::{Rerun, ScopedFutureExt, Store, StoreOptions};

/// A running bare server: its base URL and the user ids it made.
pub struct Bare {
    pub url: String,
    pub users: Vec<String>,
    store: Store,
    serving: tokio::task::JoinHandle<()>,
}

impl Bare {
    /// Migrates the store at `store_url`, makes `users` users, and serves on a free port.
    pub async fn start(store_url: &str, users: usize) -> anyhow::Result<Bare> {
        let store = Store::open(&StoreOptions::new(store_url).schema(&holdfast_shop::SCHEMA))
            .await
            .context("opening the bare checkout's store")?;
        let mut ids = Vec::with_capacity(users);
        for i in 0..users {
            let email = holdfast_core::Email::parse(&format!("bare{i}@example.com"))?;
            ids.push(store.user_create(&email, "not a password hash").await?.id);
        }
        let app = Router::new()
            .route("/cart/{user}", post(add))
            .route("/checkout/{user}", post(checkout))
            .with_state(store.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let serving = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Bare {
            url,
            users: ids,
            store,
            serving,
        })
    }

    pub async fn stop(self) {
        self.serving.abort();
        self.store.close().await;
    }
}

/// Adds one carabiner to the user's cart.
async fn add(State(store): State<Store>, Path(user): Path<String>) -> StatusCode {
    let (sku, qty) = match (Sku::parse("CARABINER"), Quantity::parse(1)) {
        (Ok(sku), Ok(qty)) => (sku, qty),
        _ => return StatusCode::INTERNAL_SERVER_ERROR,
    };
    let added = store
        .transaction("cart_add", Rerun::IfUncommitted, |tx| {
            sql::cart_add(tx, CartShape::NEW, &user, &sku, qty).scope_boxed()
        })
        .await;
    match added {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The checkout: the order, its lines, the emptied cart and its payout job, one commit.
async fn checkout(State(store): State<Store>, Path(user): Path<String>) -> (StatusCode, String) {
    let order = store
        .transaction("checkout", Rerun::IfUncommitted, |tx| {
            sql::checkout(tx, CartShape::NEW, &user).scope_boxed()
        })
        .await;
    match order.map(|o| serde_json::to_string(&o)) {
        Ok(Ok(body)) => (StatusCode::CREATED, body),
        _ => (StatusCode::SERVICE_UNAVAILABLE, String::new()),
    }
}
