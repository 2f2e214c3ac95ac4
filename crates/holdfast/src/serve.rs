//! `holdfast serve`: one stateless web instance.
//!
//! Instances are cattle: a supervisor (ours in `up.rs`, or an orchestrator in production) starts
//! them on port 0, learns the address from one line on stdout, and stops them with SIGTERM — or
//! SIGKILL — at any time. Everything durable lives in the store, so all an instance owes on the
//! way out is a clean drain: `/readyz` turns 503 while requests are still served, so balancers
//! stop sending new ones; then the listener closes, in-flight requests finish (bounded), and the
//! store's connections close.

use std::future::{pending, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use holdfast_shop::{CatalogCache, Shop, ShopOptions, UploadSetup};
use holdfast_web::{AppState, WebOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::sleep;
use tracing::{info, warn};

use crate::cli::{InstanceArgs, ServeArgs, SessionMode};
use holdfast_web::{KeyRing, SessionTier};

/// The one stdout line a supervisor waits for: `HOLDFAST_LISTENING 127.0.0.1:45678`.
pub const LISTENING: &str = "HOLDFAST_LISTENING";

/// How often expired sessions and idempotency keys are deleted.
const REAP_EVERY: Duration = Duration::from_secs(60);

/// How much longer than one request timeout in-flight requests get after the listener closes.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::die_with_parent(args.parent_pid)?;
    let terminated = crate::on_terminate()?;
    let mut opts = web_options(&args.instance, !args.insecure_cookies)?;
    opts.sessions = session_tier(&args.instance)?;
    let shop_opts = ShopOptions {
        catalog_cache: catalog_cache(&args.instance, &opts.sessions)?,
        bench_routes: args.instance.bench_routes,
        sabotage: args.sabotage.unsafe_sabotage,
        schema: if args.as_old_release {
            &holdfast_shop::SCHEMA_BEFORE_CART_LINES
        } else {
            &holdfast_shop::SCHEMA
        },
        uploads: Some(upload_setup(&args)?),
        ..ShopOptions::default()
    };
    if args.as_old_release {
        warn!("running as the release from before the change cart_lines (shop schema 1)");
    }
    if let Some(kind) = shop_opts.sabotage {
        warn!(%kind, "SABOTAGE: this instance is broken on purpose");
    }
    let grace = opts.request_timeout + SHUTDOWN_SLACK;

    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let addr = listener.local_addr()?;
    let metrics = holdfast_web::install_labelled_metrics_recorder(
        &[
            ("role", "web".to_owned()),
            ("instance", crate::instance_label(addr)),
        ],
        &[
            holdfast_web::METRICS,
            holdfast_store::METRICS,
            holdfast_sessions::METRICS,
            holdfast_cache::METRICS,
            holdfast_web::RUNTIME_METRICS,
        ],
    )
    .map_err(anyhow::Error::msg)?;
    let store = crate::open_store_as(
        &args.store,
        crate::serving_mode(args.migrate),
        shop_opts.schema,
    )
    .await?;
    // Opaque on purpose: the public answer names the instance, not its address.
    let name = format!("i-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    opts.instance_name = Some(name.clone());
    let state = AppState::new(store.clone(), opts, Some(metrics));
    crate::graphite::spawn(&args.graphite, {
        let state = state.clone();
        move || {
            let text = holdfast_web::render_instance_metrics(&state).unwrap_or_default();
            std::future::ready(text)
        }
    });
    let ops_listener = TcpListener::bind(args.ops_addr)
        .await
        .with_context(|| format!("binding --ops-addr {}", args.ops_addr))?;
    let ops_addr = ops_listener.local_addr()?;
    let operator = holdfast_web::operator_app(state.clone());
    tokio::spawn(async move { axum::serve(ops_listener, operator).await });
    crate::announce_listening(addr, Some(ops_addr))?;
    info!(%addr, %ops_addr, instance = %name, backend = %store.backend(), sessions = state.sessions().tier_name(), "serving");
    tokio::spawn(holdfast_web::reap_forever(state.clone(), REAP_EVERY));

    let (stopping_tx, stopping_rx) = oneshot::channel();
    let drain = {
        let state = state.clone();
        let delay = args.instance.drain_delay;
        async move {
            let signal = terminated.await;
            info!(signal, ?delay, "draining: /readyz is 503, still serving");
            state.start_draining();
            sleep(delay).await;
            info!(?grace, "shutting down: finishing in-flight requests");
            let _ = stopping_tx.send(());
        }
    };
    let sessions = state.sessions().clone();
    let shop = Shop::new(state, shop_opts);
    if let Some(uploads) = shop.uploads().cloned() {
        tokio::spawn(async move { uploads.run_reaper(REAP_EVERY, pending()).await });
    }
    let app = holdfast_shop::app(shop).into_make_service_with_connect_info::<SocketAddr>();
    let server =
        axum::serve(holdfast_web::public_listener(listener), app).with_graceful_shutdown(drain);
    let grace_over = async {
        match stopping_rx.await {
            Ok(()) => sleep(grace).await,
            Err(_) => pending().await,
        }
    };
    tokio::select! {
        served = server.into_future() => served.context("serving")?,
        () = grace_over => warn!("grace period over; dropping the requests still in flight"),
    }
    // Queued backstop writes of the Redis session tier (last-use times) go in before the
    // store closes; a SIGKILL loses them, which only shortens idle timeouts by one touch.
    sessions.flush().await;
    store.close().await;
    info!("stopped");
    Ok(())
}

/// Where uploads' bytes go (see `InstanceArgs::uploads`).
fn upload_setup(args: &ServeArgs) -> anyhow::Result<UploadSetup> {
    let blobs: Arc<dyn holdfast_uploads::BlobStore> = match &args.instance.uploads {
        Some(url) if url.starts_with("s3://") => {
            Arc::new(holdfast_uploads::S3Blobs::from_env(url).context("--uploads")?)
        }
        dir => {
            let dir = dir.as_ref().map_or_else(
                || args.store.data_dir.join("uploads"),
                std::path::PathBuf::from,
            );
            Arc::new(
                holdfast_uploads::LocalDir::new(&dir)
                    .with_context(|| format!("opening the uploads directory {}", dir.display()))?,
            )
        }
    };
    Ok(UploadSetup {
        blobs,
        options: holdfast_uploads::UploadOptions::default(),
    })
}

/// The session tier the flags name. The Redis connection is lazy: an instance starts, and
/// serves sessions from the store, while Redis is down.
pub fn session_tier(args: &InstanceArgs) -> anyhow::Result<SessionTier> {
    Ok(match args.sessions {
        SessionMode::Store => SessionTier::Store,
        SessionMode::Redis => {
            let url = args
                .redis_url
                .as_deref()
                .context("--sessions redis needs --redis-url or REDIS_URL")?;
            SessionTier::Redis {
                conn: holdfast_sessions::connect_redis(url).context("--redis-url")?,
                prefix: args.redis_prefix.clone(),
            }
        }
        SessionMode::Cookie => {
            let spec = args
                .session_keys
                .as_deref()
                .context("--sessions cookie needs --session-keys or HOLDFAST_SESSION_KEYS")?;
            SessionTier::Cookie {
                keys: KeyRing::parse(spec)?,
            }
        }
    })
}

/// The catalog cache's tier: Redis (under `<redis-prefix>:catalog:v1`, so deployments that
/// share a Redis do not share catalogs) when the instance has a Redis URL, reusing the session
/// tier's connection when there is one; otherwise in-process. Lazy like the session tier: a
/// Redis outage falls back to the store.
fn catalog_cache(args: &InstanceArgs, sessions: &SessionTier) -> anyhow::Result<CatalogCache> {
    let prefix = format!("{}:catalog:v1", args.redis_prefix);
    Ok(match (sessions, args.redis_url.as_deref()) {
        (SessionTier::Redis { conn, .. }, _) => CatalogCache::Redis {
            conn: conn.clone(),
            prefix,
        },
        (_, Some(url)) => CatalogCache::Redis {
            conn: holdfast_sessions::connect_redis(url).context("--redis-url")?,
            prefix,
        },
        (_, None) => CatalogCache::Local,
    })
}

/// The web crate's options with the flags' overrides; checked, so `up` can fail fast too.
pub fn web_options(args: &InstanceArgs, secure_cookies: bool) -> anyhow::Result<WebOptions> {
    let d = WebOptions::default();
    let opts = WebOptions {
        session_idle_ttl: args.session_idle_ttl.unwrap_or(d.session_idle_ttl),
        session_absolute_ttl: args.session_absolute_ttl.unwrap_or(d.session_absolute_ttl),
        idempotency_lock_ttl: args.idempotency_lock_ttl.unwrap_or(d.idempotency_lock_ttl),
        request_timeout: args.request_timeout.unwrap_or(d.request_timeout),
        secure_cookies,
        trusted_proxies: if args.trusted_proxies.is_empty() {
            d.trusted_proxies.clone()
        } else {
            args.trusted_proxies.clone()
        },
        ..d
    };
    ensure!(
        opts.idempotency_lock_ttl >= std::time::Duration::from_millis(30),
        "--idempotency-lock-ttl ({:?}) is too short (at least 30ms)",
        opts.idempotency_lock_ttl,
    );
    Ok(opts)
}
