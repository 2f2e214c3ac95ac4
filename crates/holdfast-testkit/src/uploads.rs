//! `holdfast-uploads` in-process, without the shop: the edge's accounts and sessions plus the
//! uploads routes (attached to nothing), on a fresh store of either engine and a blob
//! directory. Siblings share the database and the blob directory, as instances of one
//! machine do, so a test can start an upload on one and finish it on another.

use crate::app::{send, Reply};
use axum::body::Body;
use axum::http::Request;
use axum::Router;
use holdfast_store::{Store, StoreOptions};
use holdfast_uploads::{LocalDir, Unattached, UploadOptions, Uploads};
use holdfast_web::AppState;
use std::sync::Arc;

/// One instance serving uploads.
pub struct UploadApp {
    pub router: Router,
    pub uploads: Uploads,
    pub store: Store,
    pub url: String,
    /// Where the parts are (and, on SQLite, the database file).
    pub dir: Arc<tempfile::TempDir>,
}

/// An instance on the database at `url` (migrated here), blobs in a new directory.
pub async fn spawn_uploads(url: &str, opts: UploadOptions) -> UploadApp {
    instance(url, Arc::new(tempfile::tempdir().expect("tempdir")), opts).await
}

async fn instance(url: &str, dir: Arc<tempfile::TempDir>, opts: UploadOptions) -> UploadApp {
    let store = Store::open(&StoreOptions::new(url))
        .await
        .expect("open the store");
    let blobs = LocalDir::new(dir.path().join("uploads")).expect("blob dir");
    let uploads = Uploads::new(store.clone(), Arc::new(blobs), Arc::new(Unattached), opts);
    let edge = AppState::new(store.clone(), crate::app::local(), None);
    let router = holdfast_web::app_with_streams(
        edge.clone(),
        Router::new(),
        holdfast_uploads::router(edge, uploads.clone()),
    );
    UploadApp {
        router,
        uploads,
        store,
        url: url.to_owned(),
        dir,
    }
}

impl UploadApp {
    /// Another instance on the same database and blob directory, with its own options.
    pub async fn sibling(&self, opts: UploadOptions) -> UploadApp {
        instance(&self.url, self.dir.clone(), opts).await
    }

    /// Signs up and logs in; the `Cookie` header value.
    pub async fn user(&self, email: &str) -> String {
        crate::app::sign_up(&self.router, email).await
    }

    pub async fn send(&self, req: Request<Body>) -> Reply {
        send(&self.router, req).await
    }
}
